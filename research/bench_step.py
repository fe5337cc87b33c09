"""Training-step speed with and without bfloat16 autocast, measured in one process on the same
batches: python -m research.bench_step --config FILE [--steps N] [key=value ...].

Each round runs N optimizer steps with autocast off, then N with it on (`autocast_context`, as
the training loop uses it); rounds repeat so neither mode gets the cooler machine. Prints
seconds per step, samples/s and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch

from vlchat.errors import VlchatError
from vlchat.train import distributed
from vlchat.train.datasets import build_samples
from vlchat.train.recipe import TrainConfig, load_config
from vlchat.train.trainer import BatchMaker, TrainModule, autocast_context, build_model, group_weights, sample_indices

MODES = ("off", "bf16")


def timed_step(
    module: TrainModule, optimizer, batches: BatchMaker, indices: list[int], config: TrainConfig, device: torch.device
) -> float:
    """One optimizer step on the samples at `indices` (data preparation not timed), in seconds."""
    groups = batches(indices)
    began = time.perf_counter()
    for batch, weight in zip(groups, group_weights(groups)):
        with autocast_context(config, device):
            loss = module(
                batch.ids, batch.labels, batch.attention_mask, batch.pixels, batch.position_ids, batch.weights
            )
        (loss * weight).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - began


def measure(config: TrainConfig, steps: int, rounds: int) -> dict[str, float]:
    """Seconds per step for each autocast mode, over `rounds` x `steps` steps each."""
    world = distributed.World()
    samples = build_samples(config.data)
    module = TrainModule(build_model(config, world.device))
    batches = BatchMaker(samples, module.vlm, config)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=config.lr)
    configs = {mode: replace(config, autocast=mode) for mode in MODES}
    for number, mode in enumerate(MODES):  # warm-up: first-call allocations and kernel choices
        timed_step(
            module,
            optimizer,
            batches,
            sample_indices(number, 0, config, world, len(samples)),
            configs[mode],
            world.device,
        )
    spent = dict.fromkeys(MODES, 0.0)
    for round_ in range(rounds):
        for mode in MODES:
            for k in range(steps):  # the same batches for both modes
                indices = sample_indices(2 + round_ * steps + k, 0, config, world, len(samples))
                spent[mode] += timed_step(module, optimizer, batches, indices, configs[mode], world.device)
    return {mode: spent[mode] / (steps * rounds) for mode in MODES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.bench_step", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a training recipe (YAML)")
    parser.add_argument("--steps", type=int, default=5, help="steps per mode per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = parser.parse_args(argv)
    try:
        if args.steps < 1 or args.rounds < 1:
            raise VlchatError("--steps and --rounds must be at least 1")
        config = load_config(args.config, args.overrides)
        per_step = measure(config, args.steps, args.rounds)
    except VlchatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for mode, seconds in per_step.items():
        print(f"autocast {mode:4s}: {seconds:.3f} s/step, {config.batch_size / seconds:.2f} samples/s")
    print(
        f"bf16 autocast speed-up: {per_step['off'] / per_step['bf16']:.2f}x "
        f"({args.rounds} x {args.steps} steps per mode, batch {config.batch_size})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
